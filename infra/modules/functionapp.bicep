// The function app on the Flex Consumption plan (Linux, Python 3.11), running as the user-assigned
// identity for everything: host storage, the deployment package, the Event Hub trigger, the
// Sentinel sink (DCR) and the Azure SDK clients of enrichers and sinks (AZURE_CLIENT_ID).
param location string
param tags object = {}
param name string
param planName string
param identityId string
param identityClientId string
param storageAccountName string
param deploymentContainerUrl string
@secure()
param appInsightsConnectionString string
param eventHubNamespaceFqdn string
param eventHubName string
param consumerGroupName string
param maximumInstanceCount int = 40
param instanceMemoryMB int = 2048
param pipelineConfig string
param logsIngestionEndpoint string
param dcrImmutableId string
param dcrStreamName string

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  name: planName
  location: location
  tags: tags
  kind: 'functionapp'
  sku: {
    name: 'FC1'
    tier: 'FlexConsumption'
  }
  properties: {
    reserved: true // Linux
  }
}

resource app 'Microsoft.Web/sites@2024-04-01' = {
  name: name
  location: location
  tags: union(tags, { 'azd-service-name': 'pipeline' })
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identityId}': {}
    }
  }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: deploymentContainerUrl
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: identityId
          }
        }
      }
      scaleAndConcurrency: {
        maximumInstanceCount: maximumInstanceCount
        instanceMemoryMB: instanceMemoryMB
      }
      runtime: {
        name: 'python'
        version: '3.11'
      }
    }
    siteConfig: {
      minTlsVersion: '1.2'
      appSettings: [
        // Host storage through the identity (no keys): Event Hubs checkpoints, leases, timers.
        { name: 'AzureWebJobsStorage__accountName', value: storageAccountName }
        { name: 'AzureWebJobsStorage__credential', value: 'managedidentity' }
        { name: 'AzureWebJobsStorage__clientId', value: identityClientId }
        // The Event Hub trigger (pipeline/functions.py: connection="EventHubConnection").
        { name: 'EventHubConnection__fullyQualifiedNamespace', value: eventHubNamespaceFqdn }
        { name: 'EventHubConnection__credential', value: 'managedidentity' }
        { name: 'EventHubConnection__clientId', value: identityClientId }
        { name: 'EventHubName', value: eventHubName }
        { name: 'EventHubConsumerGroup', value: consumerGroupName }
        // azure-identity's DefaultAzureCredential in enrichers and sinks picks this identity.
        { name: 'AZURE_CLIENT_ID', value: identityClientId }
        // Logs and OpenTelemetry metrics (pipeline/telemetry.py loads azure-monitor-opentelemetry only when set).
        { name: 'APPLICATIONINSIGHTS_CONNECTION_STRING', value: appInsightsConnectionString }
        // The pipeline.
        { name: 'DLP_PIPELINE_CONFIG', value: pipelineConfig }
        { name: 'DLP_PIPELINE_DATA_DIR', value: '/tmp/dlp-pipeline' }
        // The storage account's endpoints for dead letters, the lake and the shared history (deploy/function.toml).
        { name: 'DLP_STORAGE_BLOB_URL', value: 'https://${storageAccountName}.blob.${environment().suffixes.storage}' }
        { name: 'DLP_STORAGE_TABLE_URL', value: 'https://${storageAccountName}.table.${environment().suffixes.storage}' }
        // For the Sentinel sink's settings (${DLP_SENTINEL_...} in the config file).
        { name: 'DLP_SENTINEL_DCE_ENDPOINT', value: logsIngestionEndpoint }
        { name: 'DLP_SENTINEL_DCR_IMMUTABLE_ID', value: dcrImmutableId }
        { name: 'DLP_SENTINEL_STREAM', value: dcrStreamName }
      ]
    }
  }
}

output name string = app.name
output id string = app.id

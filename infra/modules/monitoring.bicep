// Log Analytics (with Microsoft Sentinel), Application Insights, and the Logs Ingestion path of the
// Sentinel sink: data collection endpoint -> data collection rule -> custom table DLPEnrichedAlerts_CL.
// The app's identity gets Monitoring Metrics Publisher on the rule only (that is what the Logs
// Ingestion API checks). The Sentinel workbook (deploy/sentinel/workbook.json) is deployed over it.
// With enableIncidentWriteback (and Sentinel on), the identity also gets Microsoft Sentinel Responder
// on the workspace: read and update incidents, write their comments (the sentinel_incident sink).
param location string
param tags object = {}
param resourceToken string
@description('Principal (object) id of the managed identity that sends records to the rule.')
param principalId string
param enableSentinel bool = true
@description('Grant the identity Microsoft Sentinel Responder on the workspace (the sentinel_incident sink).')
param enableIncidentWriteback bool = false
param retentionInDays int = 90

// Monitoring Metrics Publisher (built-in role)
var monitoringMetricsPublisher = '3913510d-42f4-4e42-8a64-420c390055eb'
// Microsoft Sentinel Responder (built-in role): Sentinel Reader plus managing incidents
var sentinelResponder = '3e150937-b8fe-4cfb-8069-0eaf05ecd056'

var tableName = 'DLPEnrichedAlerts_CL'
var streamName = 'Custom-DLPEnrichedAlerts'

// One row per enriched record. The columns are the Sentinel sink's own table definition
// (pipeline/sinks/sentinel_schema.py writes deploy/sentinel/table.json), so they cannot drift apart.
var columns = loadJsonContent('../../deploy/sentinel/table.json', '$.properties.schema.columns')

resource workspace 'Microsoft.OperationalInsights/workspaces@2023-09-01' = {
  name: 'log-dlp-${resourceToken}'
  location: location
  tags: tags
  properties: {
    sku: {
      name: 'PerGB2018'
    }
    retentionInDays: retentionInDays
  }
}

resource appInsights 'Microsoft.Insights/components@2020-02-02' = {
  name: 'appi-dlp-${resourceToken}'
  location: location
  tags: tags
  kind: 'web'
  properties: {
    Application_Type: 'web'
    WorkspaceResourceId: workspace.id
  }
}

resource table 'Microsoft.OperationalInsights/workspaces/tables@2022-10-01' = {
  parent: workspace
  name: tableName
  properties: {
    plan: 'Analytics'
    retentionInDays: retentionInDays
    schema: {
      name: tableName
      columns: columns
    }
  }
}

resource dce 'Microsoft.Insights/dataCollectionEndpoints@2023-03-11' = {
  name: 'dce-dlp-${resourceToken}'
  location: location
  tags: tags
  properties: {
    networkAcls: {
      publicNetworkAccess: 'Enabled'
    }
  }
}

resource dcr 'Microsoft.Insights/dataCollectionRules@2023-03-11' = {
  name: 'dcr-dlp-${resourceToken}'
  location: location
  tags: tags
  properties: {
    dataCollectionEndpointId: dce.id
    streamDeclarations: {
      '${streamName}': {
        columns: columns
      }
    }
    destinations: {
      logAnalytics: [
        {
          name: 'workspace'
          workspaceResourceId: workspace.id
        }
      ]
    }
    dataFlows: [
      {
        streams: [streamName]
        destinations: ['workspace']
        transformKql: 'source'
        outputStream: 'Custom-${tableName}'
      }
    ]
  }
  dependsOn: [table]
}

resource publisher 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(dcr.id, principalId, monitoringMetricsPublisher)
  scope: dcr
  properties: {
    principalId: principalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', monitoringMetricsPublisher)
  }
}

resource sentinel 'Microsoft.SecurityInsights/onboardingStates@2024-03-01' = if (enableSentinel) {
  scope: workspace
  name: 'default'
  properties: {}
}

resource incidentResponder 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (enableSentinel && enableIncidentWriteback) {
  name: guid(workspace.id, principalId, sentinelResponder)
  scope: workspace
  properties: {
    principalId: principalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', sentinelResponder)
  }
  dependsOn: [sentinel]
}

resource workbook 'Microsoft.Insights/workbooks@2023-06-01' = {
  name: guid(workspace.id, 'dlp-enriched-alerts-workbook')
  location: location
  tags: tags
  kind: 'shared'
  properties: {
    displayName: 'DLP enriched alerts'
    category: 'sentinel'
    sourceId: workspace.id
    serializedData: loadTextContent('../../deploy/sentinel/workbook.json')
  }
  dependsOn: [table]
}

output workspaceId string = workspace.id
output appInsightsConnectionString string = appInsights.properties.ConnectionString
output logsIngestionEndpoint string = dce.properties.logsIngestion.endpoint
output dcrImmutableId string = dcr.properties.immutableId
output dcrId string = dcr.id
output streamName string = streamName
output tableName string = tableName

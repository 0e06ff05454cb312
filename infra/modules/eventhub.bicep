// Event Hub namespace, the hub the Defender XDR Streaming API writes to, the pipeline's consumer
// group, and Azure Event Hubs Data Receiver for the pipeline's identity on that hub only.
param location string
param tags object = {}
param namespaceName string
param eventHubName string
param consumerGroupName string
param partitionCount int
@description('Principal (object) id of the managed identity that reads the hub.')
param principalId string

// Azure Event Hubs Data Receiver (built-in role)
var eventHubsDataReceiver = 'a638d3c7-ab3a-418d-83e6-5f17a39d4fde'

resource namespace 'Microsoft.EventHub/namespaces@2024-01-01' = {
  name: namespaceName
  location: location
  tags: tags
  sku: {
    name: 'Standard' // consumer groups other than $Default need Standard or above
    tier: 'Standard'
    capacity: 1
  }
  properties: {
    minimumTlsVersion: '1.2'
    // The pipeline authenticates with Entra ID only. Local (SAS) auth stays available for the
    // Streaming API's export, which the Defender portal configures by resource id.
    disableLocalAuth: false
    isAutoInflateEnabled: true
    maximumThroughputUnits: 4
  }
}

resource hub 'Microsoft.EventHub/namespaces/eventhubs@2024-01-01' = {
  parent: namespace
  name: eventHubName
  properties: {
    partitionCount: partitionCount
    messageRetentionInDays: 7 // time to replay a batch after an outage
  }
}

resource consumerGroup 'Microsoft.EventHub/namespaces/eventhubs/consumergroups@2024-01-01' = {
  parent: hub
  name: consumerGroupName
  properties: {
    userMetadata: 'dlp-pipeline function app'
  }
}

resource receiver 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(hub.id, principalId, eventHubsDataReceiver)
  scope: hub
  properties: {
    principalId: principalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', eventHubsDataReceiver)
  }
}

output namespaceId string = namespace.id
output namespaceFqdn string = '${namespace.name}.servicebus.windows.net'
output hubId string = hub.id
